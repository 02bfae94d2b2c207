"""Stage 5: feature statistics of the tier's validation subset."""
from urepa.evaluate import reference_statistics
from urepa.feature_networks import build_feature_network
from urepa.runtime import resolve_device, set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources = snakemake.params, snakemake.resources
inception = snakemake.input.inception  # [folder] for clean-fid's Inception, [] for the stand-in
network = build_feature_network(params.network, inception[0] if inception else None,
                                resolve_device(resources.device, resources.gpu))
reference_statistics(snakemake.input.csv, params.image_size, network, snakemake.output[0], params.batch_size,
                     resources.data_workers)
