"""The models-by-targets benchmark (the paper's tables) and the demo built on it."""
