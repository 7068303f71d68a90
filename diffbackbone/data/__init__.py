"""Data in and out: image loading (`images`), the DataLoader pipeline of `features` (`pipeline`) and the resumable
feature store it writes (`store`, `diffbackbone.FeatureStore`)."""
