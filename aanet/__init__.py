"""AANet: facial landmarks with attention-augmented convolutions (built on ``aanet_kernels``)."""
