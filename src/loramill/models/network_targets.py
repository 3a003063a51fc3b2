"""The values of ``train.network_target`` and ``train.network_type`` (loramill.models.network
puts their layers).

Free of torch, so the train options (loramill.train.config) check the value at parse time
without importing the network's code.
"""

NETWORK_TARGETS = ("attention", "kohya", "kohya_conv")  # train.network_target
NETWORK_TYPES = ("lora", "loha", "lokr", "dora")  # train.network_type
# diffusers refuses LoHa's and LoKr's keys in any file, drops DoRA's magnitudes from a kohya
# file and reads a diffusers-format one per output row (not DoRA's input columns, models.dora):
# their export has no diffusers-format file (its users are AUTOMATIC1111's and ComfyUI's)
NO_DIFFUSERS_FILE = ("loha", "lokr", "dora")
