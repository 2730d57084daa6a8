//! Prints the CRDs (`cargo run -p virtwarden-crd --bin crdgen > examples/k8s/crd.yaml`).

fn main() {
    match virtwarden_crd::crds_yaml() {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("error: cannot serialize the CRDs: {e}");
            std::process::exit(1);
        }
    }
}
