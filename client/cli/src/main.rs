//! The `nbdraid` command-line tool.
fn main() {
    eprintln!("nbdraid: no commands yet");
    std::process::exit(2);
}
