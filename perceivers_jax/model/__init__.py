"""The PerceiverS model: Perceiver AR core, Multi-Scale cascaded cross-attention, masks, rotary, losses."""
