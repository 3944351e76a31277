from blob_pyro.evaluation.predictive import posterior_mean_probs


def accuracy_of(model, guide, batch) -> float:
    probs = posterior_mean_probs(model, guide, [batch])
    return (probs.argmax(-1) == batch["labels"]).float().mean().item()
