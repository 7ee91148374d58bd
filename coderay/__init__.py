"""coderay: CoDE (cooperative DNN services at the edge) on Ray; the core library and the command line."""
