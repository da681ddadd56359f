"""From traces and probe results to pictures: plotly figure factories, the inspector's model-free views,
and export to png / svg / pdf / html."""
