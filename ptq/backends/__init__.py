"""Library backends: maintained libraries' implementations of the algorithms we implement
(GPTQModel, llm-compressor, AutoAWQ, AutoGPTQ, hqq, optimum-quanto, torchao) and of one we do not
(AutoRound), as pipeline stages named `algorithm@library`. See stage.py (the stage and the file
exchange), envs.py (their environments) and worker/ (the code that runs inside them)."""
