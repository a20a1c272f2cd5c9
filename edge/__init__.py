"""retinaface-edge: RetinaFace-MobileNet-0.25 from PyTorch to edge devices, with proof of parity."""

__version__ = "0.1.0"
