"""Utilities: ``mmdat::`` config inheritance (:mod:`.config`), loading MMEngine checkpoints
under torch's ``weights_only`` unpickler (:mod:`.checkpoint`), launcher set-up for
``tools/train.py`` / ``tools/test.py`` (:mod:`.launch`)."""
