"""Keep third-party start-up chatter off the console of our commands (not a fix for anything:
each line below is a message that is expected on this stack)."""
from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, redirect_stdout

_VERBOSE = False


def set_verbose(on: bool = True) -> None:
    """Let third-party output through (`edge-convert --verbose`): library progress lines and native log lines."""
    global _VERBOSE
    _VERBOSE = on


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
    # torch 2.13's ONNX exporter warns once per torchvision op it cannot register ("torchvision is not installed")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    if not _VERBOSE:
        # torch 2.13's pytree, called by litert-torch 0.10 and torchao 0.18: "isinstance(treespec, LeafSpec) is deprecated"
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


@contextmanager
def native_output_quiet(litert: bool = True):
    """While the block runs, what native libraries write to the process's stderr (file descriptor 2: TensorFlow's
    oneDNN and absl notices, TFLite's "Created TensorFlow Lite XNNPACK delegate", the converter's op estimates),
    what Python code prints to stdout
    and litert-torch 0.10's own [START]/[DONE] progress lines are held back; on an exception they are replayed,
    so a failure still shows them (litert=False: leave litert-torch alone, not even imported). Nothing is held
    with `set_verbose()`. Python code in the block must not print:
    its stderr lines would be held back too."""
    if _VERBOSE:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold back
        saved = None
    with tempfile.TemporaryFile() as held:
        if saved is not None:
            os.dup2(held.fileno(), 2)
        console = _litert_console() if litert else None  # imported (if at all) while fd 2 is held: its import prints notices
        was_quiet = console.quiet if console is not None else None
        if console is not None:
            console.quiet = True
        printed = io.StringIO()  # libraries' Python prints too (ai-edge-quantizer 0.x: "Total time: ... ms")
        try:
            with redirect_stdout(printed):
                yield
        except BaseException:
            sys.stdout.write(printed.getvalue()[-20000:])
            if saved is not None:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                os.write(2, held.read()[-20000:])
            raise
        finally:
            if console is not None:
                console.quiet = was_quiet
            if saved is not None:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)


def _litert_console():
    """litert-torch's rich console (its progress lines), where litert-torch is installed."""
    try:
        from litert_torch import progress  # optional: tflite extra
    except ImportError:
        return None
    return progress.console
