# A stand-in for nixpkgs, only for `nix flake check --no-build` in tests (nixpkgs cannot be fetched
# here). It provides the few functions and packages Tightwad's flake uses, each a trivial
# derivation, so the flake's structure, arguments and outputs are evaluated for real.
{
  outputs = { self }: {
    lib = (import ./default.nix { system = "x86_64-linux"; }).lib;
  };
}
