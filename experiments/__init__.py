"""Experiments over the whole pipeline: the ablation table (`experiments.ablation`) and the paper's figures
(`experiments.figures`). These import every stage, and no stage imports them."""
