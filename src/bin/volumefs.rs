//! `volumefs`: the host storage server and the command line client of its API.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(volumefs::cli::main(args));
}
