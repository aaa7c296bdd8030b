"""Utilities: where mmdat's configs live (:mod:`.config`), what MMEngine checkpoints pickle
(:mod:`.checkpoint`), launcher set-up for ``tools/train.py`` / ``tools/test.py`` (:mod:`.launch`)."""
