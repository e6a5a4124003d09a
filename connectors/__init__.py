"""Engine-side connectors: vLLM KV connector, SGLang HiCache backend, position-independent blend."""
