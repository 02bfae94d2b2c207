"""Stage 5: feature statistics of the tier's validation subset."""
from urepa.evaluate import reference_statistics
from urepa.metrics import build_feature_network
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
config = snakemake.config
inception = snakemake.input.inception  # [folder] for clean-fid's Inception, [] for the stand-in
network = build_feature_network(snakemake.params.network, inception[0] if inception else None,
                                resolve_device(config["device"], snakemake.resources.gpu))
reference_statistics(snakemake.input.csv, snakemake.params.image_size, network, snakemake.output[0],
                     config["evaluate"]["batch_size"], config["num_workers"])
