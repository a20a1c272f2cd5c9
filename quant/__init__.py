"""Compression: structured pruning, post-training quantisation and quantisation-aware training,
distilled from the FP32 model. (Not built yet: see the compression issue.)"""
