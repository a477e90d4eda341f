"""What the commands in `experiments` share: argument parsing with one-line errors,
progress bars, strategy arguments and metric names from flags (`common`), and the
flags and start of a run of several processes (`distributed`)."""
