//! Training: SGD, augmentation, poisoning (triggers), adversarial training.
