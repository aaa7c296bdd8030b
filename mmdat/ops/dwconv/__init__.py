"""``act(x + DWConv3x3(x))`` on channels-last maps (DAT++'s local perception unit and its MLP
middle) and the whole DAT++ ConvMlp: the PyTorch formulation (:mod:`.reference`) and the CPU
ops (:mod:`.cpu`)."""
