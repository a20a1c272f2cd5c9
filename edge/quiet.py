"""Keep third-party start-up chatter off the console of our commands (not a fix for anything:
each line below is a message that is expected on this stack)."""
from __future__ import annotations

import logging
import os


def quiet_third_party() -> None:
    # absl/TFLite converter INFO lines ("oneDNN custom operations are on", "Estimated count of ops")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # torchao 0.18 warns on import that its CUDA-only kernels (_C_mxfp8, _C_cutlass_90a) and triton are absent on a CPU build
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # torch 2.13 pytree deprecation notice triggered by torchao's enum registration
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # nncf 3.4 logs INFO lines when it compiles its torch extension for fake quantisation ("Compiling and loading
    # torch extension: quantized_functions_cpu...")
    logging.getLogger("nncf").setLevel(logging.WARNING)
