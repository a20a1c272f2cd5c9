"""Compression: structured pruning (quant.prune, configured by quant.config), post-training quantisation
(quant.ptq, used by the converters) and quantisation-aware training (quant.qat), distilled from the FP32
model (quant.distill); `edge compress` (edge.commands.compress) runs them through the training loop of edge.train."""
