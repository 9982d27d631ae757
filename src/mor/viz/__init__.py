"""Routing analysis and plots: depth-coloured text, routing statistics over a corpus sample, test-time depth
scaling, and plots of training runs and benchmarks (``mor viz``). Needs matplotlib (``pip install 'mor[viz]'``)."""
