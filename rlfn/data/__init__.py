"""Training and evaluation data: where HR images come from and how they are fetched."""
