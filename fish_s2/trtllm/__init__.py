"""The slow AR on TensorRT-LLM's PyTorch backend (pinned: TensorRT-LLM 1.2.1).

``convert`` writes the model directory, ``model`` holds the out-of-tree model (tensorrt_llm is
imported only when :func:`fish_s2.trtllm.model.register` is called), ``state`` the per-request
slots, ``settings`` the LLM-API YAML and ``engine`` the streaming engine over ``LLM.generate_async``.
Importing this package needs neither tensorrt_llm nor a GPU.
"""
