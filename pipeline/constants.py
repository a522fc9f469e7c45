"""Every artifact file name in one place: writers and readers import these, nobody types them twice."""

# SAE folders, as SAELens writes them (so SAELens, SAEBench and Neuronpedia tooling read ours).
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SAE_CFG_FILENAME = "cfg.json"
SPARSITY_FILENAME = "sparsity.safetensors"

# Training run folders.
TRAIN_CONFIG_FILENAME = "train_config.yaml"
METRICS_LOG_FILENAME = "metrics.jsonl"
METRICS_FILENAME = "metrics.json"
CHECKPOINTS_DIRNAME = "checkpoints"

# Activation caches (Zarr v3 groups).
TOKENS_ARRAY = "tokens"
CHECKSUMS_GROUP = "checksums"  # checksums/<hook>: [n_chunks] uint32 CRC-32 of each chunk as written
COMPLETE_ATTR = "complete"
LOCK_SUFFIX = ".lock"  # <cache folder>.lock beside the cache: its writer's host and pid
