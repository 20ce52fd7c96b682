"""Logical axes of the activations that layers and models constrain (names: mmjax.parallel.axes)."""

ACT = ("batch", "length", "act_embed")
"""Token-sequence activations [batch, length, width]."""

ACT_IMAGE = ("batch", None, None, "act_embed")
"""Image feature maps [batch, height, width, channels]; the spatial axes are replicated."""
