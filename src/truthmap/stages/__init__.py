"""What a run directory is made of, each read from the model: answers and their activations (generate), labels
(label), exact answers (locate), activations by a second pass (activations), logit and p(True) baselines
(baselines)."""
