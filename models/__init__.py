"""Pure torch networks (no Lightning): tokenizer, quantizers, backbones, text encoders, sampling."""
