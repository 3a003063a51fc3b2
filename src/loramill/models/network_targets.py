"""The values of ``train.network_target`` (loramill.models.network puts their layers).

Free of torch, so the train options (loramill.train.config) check the value at parse time
without importing the network's code.
"""

NETWORK_TARGETS = ("attention", "kohya", "kohya_conv")  # train.network_target
