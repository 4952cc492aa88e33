"""Face data: image reading, dlib-exact alignment, the chip store and training datasets, augmentation."""
