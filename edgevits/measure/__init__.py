"""Measuring: FLOPs and parameters, `edgevits bench`, the attention analysis, the timm twin, plots. Returns data;
prints nothing."""
