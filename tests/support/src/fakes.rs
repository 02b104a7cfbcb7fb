//! The in-memory repository of the unit tests (cosmicpython's
//! `FakeRepository`), shared by tests/unit/handlers.rs and
//! tests/unit/chunk.rs.

use allocation_worker::domain::{BatchRef, Product, Sku};
use allocation_worker::service_layer::{ProductRepository, RepositoryError};

/// Every product lives in `products`, which doubles as the identity map: `get`
/// hands out the same instance every time. `seen` lists the SKUs loaded or
/// added, in that order, so that `collect_new_events` looks at those only.
#[derive(Default)]
pub struct FakeRepository {
    pub products: Vec<Product>,
    pub seen: Vec<Sku>,
}

impl FakeRepository {
    fn track(&mut self, index: Option<usize>) -> Option<&mut Product> {
        let product = &mut self.products[index?];
        if !self.seen.contains(product.sku()) {
            self.seen.push(product.sku().clone());
        }
        Some(product)
    }
}

impl ProductRepository for FakeRepository {
    fn add(&mut self, product: Product) {
        assert!(
            self.products.iter().all(|p| p.sku() != product.sku()),
            "product {} added twice",
            product.sku()
        );
        self.seen.push(product.sku().clone());
        self.products.push(product);
    }

    async fn get(&mut self, sku: &Sku) -> Result<Option<&mut Product>, RepositoryError> {
        let index = self.products.iter().position(|p| p.sku() == sku);
        Ok(self.track(index))
    }

    async fn get_by_batchref(
        &mut self,
        reference: &BatchRef,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        let index = self
            .products
            .iter()
            .position(|p| p.batch(reference).is_some());
        Ok(self.track(index))
    }

    fn seen(&mut self) -> Vec<&mut Product> {
        let seen = &self.seen;
        self.products
            .iter_mut()
            .filter(|p| seen.contains(p.sku()))
            .collect()
    }
}
