use clap::Parser;
use nearcache::config::{Cli, Config, ProcessEnv};

fn main() {
    let cli = Cli::parse();
    let config = match Config::resolve(&cli, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nearcache: {e}");
            std::process::exit(2);
        }
    };
    if cli.check_config {
        println!("nearcache: configuration OK (listen {}, upstream {})", config.listen, config.upstream.url.redacted());
        return;
    }
}
