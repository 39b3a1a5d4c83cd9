"""The application wing: the ``neco`` command, its subcommands and the experiment runner.

Everything here uses the library (``neco_loss`` outside ``app``); nothing in the library
imports from here. ``cli`` holds the entry point and the table of commands; each command is a
module of its own (``train``, ``evaluate``, ``demo``, ``ablate``, ``testbed_backbone``,
``make_images``, ``sort_demo``, ``check_sorter``) with its arguments and its run function;
``experiment`` trains a list of variants and scores them with ``evaluation.suite``;
``experiment_report`` writes the table, the paired changes and the plot.
"""
