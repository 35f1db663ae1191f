"""Training: the paper's recipe, three warm-start stages, contrastive loss, exact resume, DDP."""
