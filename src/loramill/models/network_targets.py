"""The values of ``train.network_target`` and ``train.network_type`` (loramill.models.network
puts their layers).

Free of torch, so the train options (loramill.train.config) check the value at parse time
without importing the network's code.
"""

NETWORK_TARGETS = ("attention", "kohya", "kohya_conv")  # train.network_target
NETWORK_TYPES = ("lora", "loha", "lokr", "dora")  # train.network_type
# LyCORIS's types: diffusers refuses their keys in any file, so their export has no
# diffusers-format file (its users are AUTOMATIC1111's and ComfyUI's)
NO_DIFFUSERS_FILE = ("loha", "lokr")
