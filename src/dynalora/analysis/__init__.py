"""Reading what training wrote: counted memory, run tables, figures and (next) grids of runs."""
