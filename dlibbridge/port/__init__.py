"""The exact PyTorch port of dlib's face ResNet: architecture, weight map both ways, checkpoints, exports, batch-norm calibration."""
