"""(Shifted-)window attention (DAT v1's ``L`` and ``S`` blocks): the official formulation
(:mod:`.reference`) and the CPU op (:mod:`.cpu`), both between the module's two Linear layers."""
