{
  description = "Tightwad: pool mismatched GPUs and CPUs into one OpenAI-compatible endpoint";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" "x86_64-darwin" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system:
        f (import nixpkgs { inherit system; config.allowUnfree = true; }));
      app = program: { type = "app"; inherit program; };
    in
    {
      packages = forAllSystems (pkgs: rec {
        # The one pinned llama.cpp: Metal on Darwin; CUDA or ROCm on Linux via overrides, e.g.
        #   worker.override { cudaSupport = true; }
        worker = pkgs.callPackage ./nix/worker.nix { };
        worker-cuda = worker.override { cudaSupport = true; };
        worker-rocm = worker.override { rocmSupport = true; };
        tightwad = pkgs.callPackage ./nix/tightwad.nix { llama = worker; src = self; };
        default = tightwad;
      });

      apps = forAllSystems (pkgs:
        let tw = self.packages.${pkgs.stdenv.hostPlatform.system}.tightwad; in {
          # `nix run .#worker -- --manifest URL`: this machine's part of the cluster (rpc worker on
          # Metal here, plus a drafter if the manifest places one here), as a native agent.
          worker = app "${tw}/bin/tightwad-worker";
          proxy = app "${tw}/bin/tightwad-proxy";
          operator = app "${tw}/bin/tightwad-operator";
          default = app "${tw}/bin/tightwad";
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            self.packages.${pkgs.stdenv.hostPlatform.system}.worker
            pkgs.python3 pkgs.ruff pkgs.shellcheck pkgs.hadolint pkgs.kubernetes-helm
            pkgs.cmake pkgs.ninja
          ];
          TIGHTWAD_LLAMA_PREFIX = "${self.packages.${pkgs.stdenv.hostPlatform.system}.worker}";
        };
      });
    };
}
