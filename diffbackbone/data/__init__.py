"""Data in and out: image loading (`images`), the DataLoader pipeline of `features` (`pipeline`), the resumable
feature store it writes (`store`, `diffbackbone.FeatureStore`) and the extraction run that fills it (`extract`)."""
