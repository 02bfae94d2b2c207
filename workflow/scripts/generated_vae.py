"""Save the generated stand-in of one `vaes:` entry as a diffusers AutoencoderKL folder."""
from urepa import generated
from urepa.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
generated.make_vae(snakemake.wildcards.vae, snakemake.output[0], snakemake.params.image_size,
                   snakemake.params.full_size, seed=snakemake.params.data_seed)
