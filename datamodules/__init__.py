"""Data: WebDataset video shards, clip decoding, the shard builder and the synthetic dataset."""
