"""ptq-bench: post-training quantization methods and the evaluation around them."""
