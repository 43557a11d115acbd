"""Data: WFLW and 300W loaders, the synthetic WFLW-layout set, augmentation, torch datasets."""
