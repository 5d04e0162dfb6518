"""One file per quantization method, each registered with `ptq.registry.register_method`."""
