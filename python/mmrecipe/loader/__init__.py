"""The pieces of the PyTorch loader that `mmrecipe.torch` assembles: what a release says
about its images (`release_info`), where each image's tokens are (`image_runs`), pixels
through an image processor (`pixels`), mRoPE positions for grid-rule releases (`rope`) and
the batch itself (`collate`). Nothing here reads a recipe or calls the build."""
