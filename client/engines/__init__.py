"""Adapters between inference engines and the client.

``hf`` moves a Hugging Face transformers model's KV cache in whole blocks;
``vllm`` is a connector shaped like vLLM's v1 KV-connector API. Each imports
its engine's package only when used, so the client needs neither.
"""
