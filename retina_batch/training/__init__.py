"""Training the Attention U-Net: data pairing and splits, augmentation, loss, the loop."""
