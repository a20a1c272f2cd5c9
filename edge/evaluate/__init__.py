"""Measuring: the parity harness, the WIDER FACE and AFLW2000-3D evaluators, the peer detectors they compare
against (YuNet, BlazeFace) and the mesh teacher (MediaPipe's face landmarks)."""
